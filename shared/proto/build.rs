//! Compiles `proto/c2m/v1/*.proto` with protox (pure Rust, no system `protoc`), writes the Rust code
//! and the encoded descriptor set to `OUT_DIR` only.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a build directory shared by
    // two checkouts may reuse this script's binary for the other one.
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../../proto");
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("c2m/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let mut files: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("c2m_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // RPCs a service does not implement yet answer UNIMPLEMENTED instead of failing to compile.
        .generate_default_stubs(true)
        .compile_fds(fds)?;

    // The error details c2m sends, for reflection only (tonic-types has their Rust types).
    let details = manifest_dir.join("details");
    let details_fds =
        protox::compile([details.join("google/rpc/error_details.proto")], [&details])?;
    std::fs::write(
        out.join("error_details_descriptor.bin"),
        prost::Message::encode_to_vec(&details_fds),
    )?;

    println!("cargo:rerun-if-changed={}", root.display());
    println!("cargo:rerun-if-changed={}", details.display());
    Ok(())
}
