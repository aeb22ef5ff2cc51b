"""The test suite; tests/helpers.py is shared with bench/ as `tests.helpers`.

A regular package, not a namespace one: some wheels (verl's) install a top-level `tests`
package, which would otherwise win over this directory.
"""
