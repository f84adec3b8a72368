//! Container images on the host: references, registries, their layers unpacked into a
//! content-addressed cache, and an image's layers merged into the read-only tree a sandbox
//! uses as its root.
//!
//! - [`accounts`]: the `user` account added to trees that lack it.
//! - [`build`]: images built from a Dockerfile: parsing, `COPY` layers, build states.
//! - [`cache`]: images pulled into a cache of shared layers and one merged tree each.
//! - [`reference`]: image references as users write them.
//! - [`registry`]: manifests resolved for linux/amd64 and blobs fetched, every byte checked
//!   against its digest.
//! - [`unpack`]: one (untrusted) OCI tar layer unpacked safely into a directory.
//! - [`tree`]: unpacked layers merged, as an overlay would show them, into one tree.

pub mod accounts;
pub mod build;
pub mod cache;
mod error;
pub mod reference;
pub mod registry;
mod stream;
mod sys;
pub mod tree;
pub mod unpack;

pub use cache::{ImageCache, PullEvent, PulledImage};
pub use error::ImageError;
pub use reference::ImageRef;
