//! Adapters so that a filter or a map is one function or one small type.

use brume_protocol::Field;

use crate::{Context, Emitter, Module, ModuleReading};

/// A module that keeps some readings and drops the rest. Kept readings go to the
/// manifest's first output stream via [`Emitter::forward`] (with a `source` field).
pub trait Filter: Default {
    /// Applies the config block; see [`Module::init`].
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Whether to forward `reading`.
    fn keep(&mut self, reading: &ModuleReading) -> bool;
}

/// A [`Filter`] as a [`Module`]; `export_filter!` exports it. Reports the metrics
/// `filter_in` and `filter_kept` per batch.
#[derive(Default)]
pub struct FilterModule<F>(pub F);

impl<F: Filter> Module for FilterModule<F> {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        self.0.init(config)
    }

    fn process(&mut self, input: &[ModuleReading], out: &mut Emitter, _ctx: &mut Context) -> Result<(), String> {
        let to = out.default_output();
        let mut kept = 0;
        for r in input {
            if self.0.keep(r) {
                out.forward(to, r);
                kept += 1;
            }
        }
        out.metric("filter_in", input.len() as f64);
        out.metric("filter_kept", f64::from(kept));
        Ok(())
    }
}

/// A module that turns each reading into zero or one output reading with the same
/// timestamp on the manifest's first output stream.
pub trait Map: Default {
    /// Applies the config block; see [`Module::init`].
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// The output fields for `reading`, `None` to emit nothing, `Err` to fail the batch.
    fn map(&mut self, reading: &ModuleReading) -> Result<Option<Vec<Field>>, String>;
}

/// A [`Map`] as a [`Module`]; `export_map!` exports it.
#[derive(Default)]
pub struct MapModule<M>(pub M);

impl<M: Map> Module for MapModule<M> {
    fn init(&mut self, config: &serde_json::Value) -> Result<(), String> {
        self.0.init(config)
    }

    fn process(&mut self, input: &[ModuleReading], out: &mut Emitter, _ctx: &mut Context) -> Result<(), String> {
        let to = out.default_output();
        for r in input {
            if let Some(fields) = self.0.map(r)? {
                out.emit(to, r.ts_ns, fields);
            }
        }
        Ok(())
    }
}
