"""The operator console: a static web page at /console that signs in with the admin key and calls the admin API."""
