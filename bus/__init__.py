"""The NATS layer every BitNexus service stands on."""
