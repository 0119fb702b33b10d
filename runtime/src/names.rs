//! The one way a name (a VM, a disk, a region, a resource group) becomes a
//! file or directory name. The encoding is injective, so two names never
//! share a path (`web.1` and `web_1` are different VMs with different
//! files), and its output is always a safe single path component.

/// Encodes `name` for use as one path component: ASCII letters, digits and
/// '-' stay as they are; every other byte (including '_' itself, the escape)
/// becomes `_` and two lowercase hex digits. Distinct names give distinct
/// outputs; the output never contains '/', never starts with '.', and is
/// never empty.
pub fn path_name(name: &str) -> String {
    if name.is_empty() {
        return "_".to_string();
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_used_to_collide_get_their_own_paths() {
        let names = [
            "web.1", "web_1", "web-1", "web1", "a-b", "a_b", "a.b", "", "_", "..", ".", "a/b",
            "_2e", "web_2e1",
        ];
        let encoded: std::collections::BTreeSet<String> =
            names.iter().map(|n| path_name(n)).collect();
        assert_eq!(encoded.len(), names.len(), "{encoded:?}");
        for e in &encoded {
            assert!(
                !e.is_empty() && !e.contains('/') && !e.starts_with('.'),
                "{e}"
            );
        }
        assert_eq!(path_name("vm-1"), "vm-1", "plain names stay readable");
        assert_eq!(path_name("web.1"), "web_2e1");
    }
}
