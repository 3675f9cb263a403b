//! The transformer.
