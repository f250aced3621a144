"""The Python package against what torch users type and hostile files."""
import unittest
