//! The Backend trait.
