//! Sources of readings: the built-in MQTT listener, subscribe mode, HTTP (see
//! [`crate::http`]) and the simulator. Every source turns its input into
//! [`brume_protocol::Reading`]s with [`payload`] and hands them to the store; none
//! acknowledges anything before the store's commit.

pub mod mqtt_listener;
pub mod payload;
pub mod simulator;
pub mod subscribe;
