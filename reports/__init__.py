"""Reports on loopmark results: load them, plot them, write report.md/report.html, compare two runs.

Nothing here imports torch: reports are made on any machine from the results files alone.
"""
