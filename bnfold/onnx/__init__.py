"""The ONNX frontend: op tables, constants, the graph adapter, model files. Never imports torch."""
