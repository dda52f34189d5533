//! How the router hands its skill detection to the daemon it picked: the
//! [`DETECTED_SKILLS_HEADER`] on a forwarded request that named no skills, so the daemon
//! serves exactly the skills the request was routed for instead of detecting again over its
//! own view of the skills (which can differ from the fleet's during a rollout, or when the two
//! were started with different detector settings).

/// Request header carrying the skills the router detected, comma-separated (empty: none).
/// The router sets it on every forwarded request that named no skills and strips it from
/// every other; the daemon reads it only when the body's `skills` is absent or `"auto"`.
pub const DETECTED_SKILLS_HEADER: &str = "x-skillkv-detected-skills";

/// The header value for `skills`: their names joined by commas.
pub fn detected_skills_value(skills: &[String]) -> String {
    skills.join(",")
}

/// The skill names of a header value: split at commas, trimmed, empty parts dropped,
/// sorted and deduplicated.
pub fn parse_detected_skills(value: &str) -> Vec<String> {
    let mut names: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_tolerate_spaces_and_repeats() {
        let skills = vec!["beta".to_string(), "alpha".to_string()];
        assert_eq!(detected_skills_value(&skills), "beta,alpha");
        assert_eq!(
            parse_detected_skills(&detected_skills_value(&skills)),
            vec!["alpha", "beta"]
        );
        assert_eq!(parse_detected_skills(" b , a,,b "), vec!["a", "b"]);
        assert!(parse_detected_skills("").is_empty());
        assert!(parse_detected_skills(" , ").is_empty());
    }
}
