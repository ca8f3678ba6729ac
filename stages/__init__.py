"""Pipeline stages: one module per DVC stage, each runnable as `python -m stages.<name>`.

Importing the package lets a stage tell the flow what kind of error ended it (check, transient or
unknown), when the flow asks for that through PIPELINE_ERROR_FILE: see stages/common/errors.py.
"""
from stages.common.errors import install_hook

install_hook()
