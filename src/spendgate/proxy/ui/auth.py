"""Who may see the dashboard: the admin token, typed once into a login form, then a cookie.

The cookie holds an HMAC of the token, not the token: a copied cookie opens the dashboard but is
not the bearer token of the admin API, and changing the token (restarting with another) ends
every session. It is HttpOnly (no script reads it) and SameSite=Strict (no other site's page
sends it). State-changing forms carry a second HMAC as a CSRF token, and a request whose
``Origin`` names another host is refused too, so a page elsewhere cannot approve a hold.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "spendgate_ui"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-Spendgate-CSRF"


def _mac(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), f"spendgate-ui {purpose}".encode(), hashlib.sha256).hexdigest()


def session_value(token: str) -> str:
    """What the login cookie holds for ``token``: the same on every instance sharing the token."""
    return _mac(token, "session")


def csrf_token(token: str) -> str:
    """The value a state-changing form or call must send back (hidden field or header)."""
    return _mac(token, "csrf")


def token_matches(sent: str, token: str) -> bool:
    return hmac.compare_digest(sent.encode(), token.encode())


def signed_in(request: web.Request, token: str | None) -> bool:
    """A valid session cookie, or the admin API's ``Authorization: Bearer`` header (for scripts)."""
    if not token:
        return False
    cookie = request.cookies.get(COOKIE, "")
    if cookie and hmac.compare_digest(cookie.encode(), session_value(token).encode()):
        return True
    sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return bool(sent) and token_matches(sent, token)


def same_origin(request: web.Request) -> bool:
    """False when the browser says the request comes from another origin (``Origin`` or
    ``Sec-Fetch-Site``); a request with neither header is not from a browser's cross-site page."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":  # an opaque origin: only the browser's own same-origin word vouches for it
        return site == "same-origin"
    return urlsplit(origin).netloc == request.host


def csrf_ok(request: web.Request, token: str, form_value: str | None) -> bool:
    """A state-changing call is accepted from this dashboard's own pages only."""
    sent = form_value or request.headers.get(CSRF_HEADER) or ""
    return same_origin(request) and bool(sent) and hmac.compare_digest(sent.encode(), csrf_token(token).encode())


def set_session(response: web.StreamResponse, token: str, secure: bool) -> None:
    response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="Strict", path="/ui",
                        secure=secure)


def clear_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/ui")
