"""The whole optitrainer conformance kit over this plugin's names: one line."""

from optitrainer.testing import conformance_test

test_conformance = conformance_test(dist="optitrainer-signum")
