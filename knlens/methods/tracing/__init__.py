"""methods/tracing"""
