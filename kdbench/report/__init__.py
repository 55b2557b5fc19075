"""kdbench.report"""
