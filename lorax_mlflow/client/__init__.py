"""The engine client side: tokenizer, validation, output processing and streams (see engine_client)."""
