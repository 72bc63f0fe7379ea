"""Publishing a trained model: its model card (``card.py``), the push to the Hugging Face Hub (``hub.py``),
and the ``prefopt push`` command (``commands.py``)."""
