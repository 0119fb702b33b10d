//! Compiles `ferry/**/*.proto` with protox (pure Rust, no protoc binary), writes
//! the FileDescriptorSet that server reflection serves, and generates the tonic
//! clients and servers from that same set.

use std::path::{Path, PathBuf};

use prost::Message;

fn protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    protos(&root.join("ferry"), &mut files)?;
    files.sort();

    println!("cargo:rerun-if-changed={}", root.join("ferry").display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ferry_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    // Payloads as `bytes::Bytes`: they move between tasks without copies.
    tonic_prost_build::configure()
        .bytes(".ferry.cache.v1.WriteOp.data")
        .bytes(".ferry.processor.v1.DiskExtent.data")
        .bytes(".ferry.processor.v1.SeedData.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
