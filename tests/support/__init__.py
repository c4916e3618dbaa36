"""What the tests share: paths, the generated corpora, tiny models, launchers and converters' fixtures.

Test modules import helpers from here and never from one another.
"""
