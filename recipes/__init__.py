"""The example recipes, installed as the package ``prefopt._recipes`` (see pyproject.toml) so that a wheel
ships them; read them with ``prefopt.recipe.examples``. This file makes the folder a regular package: an
editable install finds a mapped sub-package only by its ``__init__.py``."""
