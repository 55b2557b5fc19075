"""kdbench.engine"""
