"""Archive service: owner of the genealogical documents and of each run's state machine."""
