//! Placeholder while the family is written.
use super::{config::TextConfig, ArchSpec, Family};
use anyhow::{bail, Result};

pub const FAMILY: Family = Family {
    name: "laguna",
    model_types: &[],
    architectures: &[],
    summary: "",
    parse,
};

fn parse(_text: &TextConfig) -> Result<ArchSpec> {
    bail!("not yet")
}
