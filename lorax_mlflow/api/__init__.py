"""Each surface's wire format <-> the engine: one request builder per surface (its schema checks
JSON types; the builder turns the body into a PreparedRequest in one pass), one output formatter
per wire format. Surfaces (server/, chat_model.py) import from here; this imports service.py and
below."""
