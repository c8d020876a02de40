//! Compiles `proto/holdfast/v1/*.proto` into Rust with tonic, and writes the
//! file descriptor set that the reflection service serves (so grpcurl works
//! with no proto files at hand).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The vendored protoc means a fresh machine needs nothing from apt to build.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment while we set it.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = std::fs::read_dir("proto/holdfast/v1")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let mut protos: Vec<PathBuf> = protos
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("holdfast_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto")])?;
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!()` embeds `migrations/` at compile time but cannot
    // tell cargo to watch it: without this, a new migration file alone
    // leaves a stale binary that never runs it (sqlx's documented advice).
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
