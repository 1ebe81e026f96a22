//! The formats: what bytes mean, with no round logic. The signed envelope every object is,
//! the gradient codec inside a shard, the Parquet tables, and the object keys.

pub mod agg_tensor;
pub mod codec;
pub mod envelope;
pub mod layout;
pub mod tables;
