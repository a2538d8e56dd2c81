//! What the user sees: tables (comfy-table), bars, unit formatting.

pub mod units;
