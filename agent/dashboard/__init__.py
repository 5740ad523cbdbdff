"""The live dashboard of the network (``GET /`` on the admin API) and its streams."""
