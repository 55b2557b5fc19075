"""kdbench.cli"""
