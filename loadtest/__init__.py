"""Load tests for a running `fastast serve`: a Locust file for mixed-r traffic and a saturation sweep over r."""
