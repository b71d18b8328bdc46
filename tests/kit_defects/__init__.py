"""Small plugins, each with one defect the conformance kit must catch (and one correct control).

Each module defines module-level ``OptimizerSpec`` objects; ``tests/test_check_defects.py`` registers
them in-process (``optitrainer.register``). Names start with ``kd_`` so that they clash with nothing.
"""
