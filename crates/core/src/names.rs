//! Rules for names that cross process boundaries.

/// The longest service name: it must fit a DNS label, since the same names are used
/// for Kubernetes services.
pub const MAX_SERVICE_NAME_LEN: usize = 63;

/// Check a service name: 1 to 63 of `a-z`, `0-9` and `-`, starting with a letter and
/// not ending with `-` (a DNS label).
pub fn validate_service_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > MAX_SERVICE_NAME_LEN {
        return Err(format!(
            "service name must be 1 to {MAX_SERVICE_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if !ok_chars || !name.as_bytes()[0].is_ascii_lowercase() || name.ends_with('-') {
        return Err(format!(
            "service name {name:?} must be lowercase letters, digits and '-', start with a letter and not end with '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels_only() {
        assert!(validate_service_name("catalog").is_ok());
        assert!(validate_service_name("catalog-v2").is_ok());
        for bad in [
            "",
            "Catalog",
            "1cat",
            "cat-",
            "cat_x",
            "cat/x",
            &"a".repeat(64),
        ] {
            assert!(validate_service_name(bad).is_err(), "{bad:?}");
        }
    }
}
