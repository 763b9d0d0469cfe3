"""ONNX export of FastAST models (one graph per ToMe r) and the ONNX Runtime runner that serves them.

fastast.export.spec is the on-disk contract (graph names, interface, the card entry); fastast.export.onnx writes
and validates the graphs; fastast.export.ort loads them back and runs them;
fastast.export.backend plugs that runner into the serving Backend interface.
"""
