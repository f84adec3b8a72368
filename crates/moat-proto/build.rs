//! Compiles the envd-compatible `.proto` files (pure Rust, no `protoc`) into prost messages with
//! proto3 canonical JSON (pbjson) implementations.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/process.proto", "proto/filesystem.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("descriptors.bin");
    let fds = protox::compile(protos, ["proto"])?;
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(&descriptor_path, &bytes)?;

    let mut config = prost_build::Config::new();
    config.file_descriptor_set_path(&descriptor_path);
    config.skip_protoc_run();
    config.compile_well_known_types();
    config.extern_path(".google.protobuf", "::pbjson_types");
    config.compile_protos(&protos, &["proto"])?;

    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
