//! `tidegate check [FILE|DIR|-]...`: finds the graceful-shutdown and probe pitfalls in
//! Kubernetes manifests of pods that run tidegate (classic or native sidecar, or supervisor
//! mode), each with its severity, object, field, why it matters and the fix.

mod manifest;
mod rules;

use clap::{Parser, ValueEnum};
use serde::Serialize;

pub use self::manifest::InputError;

/// `tidegate check` flags.
#[derive(Debug, Parser)]
#[command(
    name = "tidegate check",
    bin_name = "tidegate check",
    about = "Check Kubernetes manifests of pods that run tidegate for shutdown and probe pitfalls",
    after_help = "Exit codes: 0 no errors (warnings allowed), 1 errors found, 2 unreadable input."
)]
pub struct CheckArgs {
    /// Manifests: YAML files, directories (searched for .yaml/.yml), or - for stdin
    #[arg(required = true, value_name = "FILE|DIR|-")]
    pub inputs: Vec<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Output format of `tidegate check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One block per finding.
    Text,
    /// A JSON document, for CI.
    Json,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Likely to hurt.
    Warning,
    /// Will drop requests or break the pod.
    Error,
}

/// One pitfall found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// Rule id.
    pub rule: &'static str,
    /// File it came from.
    pub source: String,
    /// `Kind/name`.
    pub object: String,
    /// Field path, e.g. `spec.template.spec.terminationGracePeriodSeconds`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Why it matters.
    pub why: String,
    /// How to fix it.
    pub fix: String,
}

/// The result of a check.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Pods that run tidegate.
    pub pods_checked: usize,
    /// Findings, most severe first.
    pub findings: Vec<Finding>,
}

/// Checks the manifests named in `args`.
pub fn check(args: &CheckArgs) -> Result<Report, InputError> {
    let objects = manifest::read_inputs(&args.inputs)?;
    Ok(check_objects(&objects))
}

/// Checks the YAML documents in `text` (named `source` in findings), as read from one file.
pub fn check_str(source: &str, text: &str) -> Result<Report, InputError> {
    let mut objects = Vec::new();
    manifest::parse_documents(source, text, &mut objects)?;
    Ok(check_objects(&objects))
}

fn check_objects(objects: &[manifest::Object]) -> Report {
    let pods = manifest::tidegate_pods(objects);
    let mut findings = Vec::new();
    for pod in &pods {
        rules::check_pod(pod, objects, &mut findings);
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    Report {
        pods_checked: pods.len(),
        findings,
    }
}

/// Runs `tidegate check` with its arguments (after `check`); returns the exit code.
pub fn main(argv: impl IntoIterator<Item = String>) -> i32 {
    let args = match CheckArgs::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            let rendered = e.render().to_string();
            eprintln!(
                "tidegate check: {}",
                rendered
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
            );
            return 2;
        }
    };
    let report = match check(&args) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("tidegate check: {}", crate::error::ErrorChain(&error));
            return 2;
        }
    };
    match args.format {
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => {
                eprintln!("tidegate check: {error}");
                return 2;
            }
        },
        Format::Text => print_text(&report),
    }
    i32::from(
        report
            .findings
            .iter()
            .any(|f| f.severity == Severity::Error),
    )
}

fn print_text(report: &Report) {
    for f in &report.findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        println!(
            "{severity}[{}] {} {} ({})",
            f.rule, f.object, f.field, f.source
        );
        println!("  {}", f.message);
        println!("  why: {}", f.why);
        println!("  fix: {}", f.fix);
    }
    let count = |s: Severity| report.findings.iter().filter(|f| f.severity == s).count();
    println!(
        "{} pod(s) running tidegate checked: {} error(s), {} warning(s), {} info",
        report.pods_checked,
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Info)
    );
}

#[cfg(test)]
mod tests;
