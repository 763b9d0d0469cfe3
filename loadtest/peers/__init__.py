"""Peer servers (Mosec, LitServe) serving fastast's model with its preprocessing and batching limits, so
loadtest.frontend can drive them beside `fastast serve`. Their packages are not dependencies of fastast:
install them to rerun (see each file)."""
