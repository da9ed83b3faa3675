"""Topics, codecs and schemas shared by every pipeline stage."""
