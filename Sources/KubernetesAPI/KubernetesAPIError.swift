import Foundation

/// Why reading from the API server failed, with the exit code the CLI should use.
///
/// Exit codes follow sysexits(3): 64 usage or configuration, 65 bad data from the server,
/// 69 server unreachable (connection, DNS, TLS, timeout, server errors), 77 not allowed (401/403, a
/// credential plugin that fails). The description never contains a bearer token or key material.
public struct KubernetesAPIError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// No in-cluster environment and no kubeconfig.
        case noConfiguration
        /// A kubeconfig or option that cannot be used (missing context, unreadable file, bad certificate data).
        case configuration
        /// 401/403, or credentials that cannot be obtained (a failing exec plugin).
        case unauthorized
        /// Connection refused, DNS failure, TLS failure, timeout, 5xx.
        case unavailable
        /// A response that is not the Kubernetes list it should be.
        case badData
    }

    public var kind: Kind
    public var description: String
    /// The HTTP status the server answered with, when there was one.
    public var httpStatus: Int?

    public init(_ kind: Kind, _ description: String, httpStatus: Int? = nil) {
        self.kind = kind
        self.description = description
        self.httpStatus = httpStatus
    }

    /// 64 usage/configuration, 65 bad data, 69 unavailable, 77 not allowed.
    public var exitCode: Int32 {
        switch kind {
        case .noConfiguration, .configuration: return 64
        case .badData: return 65
        case .unavailable: return 69
        case .unauthorized: return 77
        }
    }

    /// Replaces every secret in the message with `<redacted>`.
    func redacting(_ secrets: [String]) -> KubernetesAPIError {
        var copy = self
        copy.description = Redactor.redact(description, secrets)
        return copy
    }
}

enum Redactor {
    /// Secrets shorter than 4 characters are left alone: replacing them would garble ordinary words.
    static func redact(_ text: String, _ secrets: [String]) -> String {
        var out = text
        for s in secrets where s.count >= 4 {
            out = out.replacingOccurrences(of: s, with: "<redacted>")
        }
        return out
    }
}
