"""kdbench.contract"""
