//! Generates the gRPC code for the CSI spec and for the controller↔agent API.
//! Only code generation happens here: no network, no git, no system protoc (the vendored one is used).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // RPCs we do not advertise answer UNIMPLEMENTED, as the CSI spec expects.
        .generate_default_stubs(true)
        .compile_protos(
            &[
                std::path::PathBuf::from("proto/csi/v1/csi.proto"),
                std::path::PathBuf::from("proto/strata/agent/v1/agent.proto"),
                std::path::PathBuf::from("proto/strata/store/v1/manifest.proto"),
            ],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
