//! [`PolicySpec`]: a commit-notification policy with durations, as given on the command
//! line, and its conversion to the protocol's tick-based [`Policy`].

use std::time::Duration;

use super::protocol::Policy;

/// Policy with durations, converted to ticks for the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySpec {
    Piggyback,
    Periodic(Duration),
    Eager,
    IdleAck,
    IdleCommit,
    IdleDelayed(Duration),
}

impl PolicySpec {
    /// Parses `piggyback`, `periodic:50ms`, `eager`, `idle_ack`, `idle_commit`,
    /// `idle_delayed:1ms` (durations
    /// in milliseconds, fractions allowed, the unit required; the command lines read the
    /// durations with any unit and use this for the rest).
    pub fn parse(s: &str) -> Result<PolicySpec, String> {
        let (name, param) = match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        let ms = |p: Option<&str>| -> Result<Duration, String> {
            let p = p.ok_or_else(|| format!("{s:?}: {name} needs a duration, e.g. {name}:50ms"))?;
            let num = p
                .strip_suffix("ms")
                .ok_or_else(|| format!("{s:?}: {p:?} needs a unit: add one, e.g. {name}:{p}ms"))?;
            let v: f64 = num
                .parse()
                .map_err(|_| format!("{s:?}: {p:?} is not a duration in milliseconds"))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{s:?}: duration must be ≥ 0"));
            }
            Ok(Duration::from_secs_f64(v / 1000.0))
        };
        let no_param = |p: Option<&str>| match p {
            Some(_) => Err(format!("{s:?}: {name} takes no parameter")),
            None => Ok(()),
        };
        match name {
            "piggyback" => no_param(param).map(|_| PolicySpec::Piggyback),
            "eager" => no_param(param).map(|_| PolicySpec::Eager),
            "idle_ack" => no_param(param).map(|_| PolicySpec::IdleAck),
            "idle_commit" => no_param(param).map(|_| PolicySpec::IdleCommit),
            "periodic" => Ok(PolicySpec::Periodic(ms(param)?)),
            "idle_delayed" => Ok(PolicySpec::IdleDelayed(ms(param)?)),
            _ => Err(format!(
                "{s:?}: unknown policy (piggyback, periodic:H, eager, idle_ack, idle_commit, \
                 idle_delayed:D)"
            )),
        }
    }
    /// The protocol policy's name ([`Policy::name`]).
    pub fn name(&self) -> &'static str {
        self.to_policy(Duration::from_millis(1)).name()
    }
    /// H or d in milliseconds (0 when the policy has no parameter).
    pub fn param_ms(&self) -> f64 {
        match self {
            PolicySpec::Periodic(d) | PolicySpec::IdleDelayed(d) => d.as_secs_f64() * 1000.0,
            _ => 0.0,
        }
    }
    pub fn to_policy(&self, tick: Duration) -> Policy {
        let ticks = |d: &Duration| (d.as_nanos() / tick.as_nanos().max(1)).max(1) as u64;
        match self {
            PolicySpec::Piggyback => Policy::Piggyback,
            PolicySpec::Periodic(d) => Policy::Periodic { every: ticks(d) },
            PolicySpec::Eager => Policy::Eager,
            PolicySpec::IdleAck => Policy::IdleAck,
            PolicySpec::IdleCommit => Policy::IdleCommit,
            PolicySpec::IdleDelayed(d) if d.is_zero() => Policy::IdleDelayed { delay: 0 },
            PolicySpec::IdleDelayed(d) => Policy::IdleDelayed { delay: ticks(d) },
        }
    }
}

impl std::fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySpec::Periodic(_) | PolicySpec::IdleDelayed(_) => {
                write!(f, "{}:{}ms", self.name(), self.param_ms())
            }
            _ => f.write_str(self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_specs_parse_and_bad_ones_say_why() {
        assert_eq!(PolicySpec::parse("idle_ack"), Ok(PolicySpec::IdleAck));
        assert_eq!(PolicySpec::parse("idle_commit"), Ok(PolicySpec::IdleCommit));
        assert!(PolicySpec::parse("idle")
            .unwrap_err()
            .contains("unknown policy"));
        assert_eq!(
            PolicySpec::parse("periodic:50ms"),
            Ok(PolicySpec::Periodic(Duration::from_millis(50)))
        );
        assert!(PolicySpec::parse("periodic:50")
            .unwrap_err()
            .contains("needs a unit"));
        assert_eq!(
            PolicySpec::parse("idle_delayed:1ms"),
            Ok(PolicySpec::IdleDelayed(Duration::from_millis(1)))
        );
        let tick = Duration::from_micros(100);
        assert_eq!(
            PolicySpec::parse("periodic:200ms").unwrap().to_policy(tick),
            Policy::Periodic { every: 2000 }
        );
        assert!(PolicySpec::parse("periodic")
            .unwrap_err()
            .contains("needs a duration"));
        assert!(PolicySpec::parse("eager:5")
            .unwrap_err()
            .contains("takes no parameter"));
        assert!(PolicySpec::parse("sometimes")
            .unwrap_err()
            .contains("unknown policy"));
        assert!(PolicySpec::parse("periodic:-1ms").is_err());
        assert!(PolicySpec::parse("periodic:abc").is_err());
        // Names come from the protocol's policies, and print back to what parses.
        for s in [
            "piggyback",
            "periodic:50ms",
            "eager",
            "idle_ack",
            "idle_commit",
            "idle_delayed:0ms",
        ] {
            let p = PolicySpec::parse(s).unwrap();
            assert_eq!(PolicySpec::parse(&p.to_string()), Ok(p), "{s}");
        }
        assert_eq!(
            PolicySpec::parse("idle_delayed:0ms").unwrap().name(),
            "idle_delayed"
        );
    }
}
