"""Windows onto a running guard: Prometheus metrics (:mod:`.metrics`) and the decision feed
``spendgate tail`` reads from the store (:mod:`.tail`).

Both only watch: nothing here decides, holds or charges, and neither adds a store call to the
request path (metrics count in memory; the feed reads the store's event log from another process).
"""
