"""Model families: each folder holds one family's config builder, its Hugging Face conversion
and (later) its parallel plans. Generic modules (decoder, block, MTP) live in `tessera.components.model`."""
