"""What both doors (the proxy and the SDK) do to provider traffic: edit bodies, meter streams."""
