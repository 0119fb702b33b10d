//! The one way a name (a VM, a disk, a region, a resource group) becomes a
//! file or directory name: [`ferry_proto::ids::path_name`], re-exported
//! here for the services that reach it through the runtime.

pub use ferry_proto::ids::path_name;
