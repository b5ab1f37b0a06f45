"""One module per dataset: its on-disk layout reader, label space and split rule.

Only Kermany's pneumonia set lives here so far; NIH ChestX-ray14 and the COVID-19 Radiography Database are still
read by ``pipelines/data/layouts.py`` and move here with the dataset registry (issue 16).
"""
