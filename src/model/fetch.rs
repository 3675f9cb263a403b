//! Known models and the cache they are fetched into (`$GENIUS_HOME`).

use anyhow::Result;
use std::path::PathBuf;

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub struct KnownModel {
    pub name: &'static str,
}

pub fn known_model(_name: &str) -> Option<&'static KnownModel> {
    None
}

pub fn known_model_names() -> Vec<&'static str> {
    vec![DEFAULT_MODEL]
}

pub fn ensure_model(m: &KnownModel) -> Result<PathBuf> {
    anyhow::bail!("fetching {} is being written", m.name)
}
