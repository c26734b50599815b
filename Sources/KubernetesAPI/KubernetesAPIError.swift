import Foundation
import KubeObjects

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
    /// Each secret is also looked for in the forms other layers print it in: Swift's escaped string
    /// (`\n`, `\u{1B}`), JSON's (`\n`, `\u001b`), percent-encoded, trimmed, and line by line (an
    /// error may quote one line of a multi-line value).
    static func redact(_ text: String, _ secrets: [String]) -> String {
        var out = text
        var forms: [String] = []
        for s in secrets where s.count >= 4 { forms += variants(s) }
        // Longest first, so a form that contains another is replaced whole.
        for form in Set(forms).sorted(by: { $0.count > $1.count }) where form.count >= 4 {
            out = out.replacingOccurrences(of: form, with: "<redacted>")
        }
        return out
    }

    static func variants(_ s: String) -> [String] {
        var forms = [s, String(String(reflecting: s).dropFirst().dropLast()), String(JSONValue.quoted(s).dropFirst().dropLast()),
                     percentEncode(s), s.trimmingCharacters(in: .whitespacesAndNewlines)]
        forms += s.split(whereSeparator: { $0.isNewline || $0 == "\r" }).map(String.init).filter { $0.count >= 8 }
        return forms
    }
}

/// Checks a credential before it goes into an HTTP header, so a pasted newline is reported as a kubeconfig
/// problem naming the field, instead of as an HTTP client error that quotes the header (and the secret).
enum CredentialCheck {
    /// Why `value` cannot be sent as (part of) a header value, in words that never include the value;
    /// nil when it can. Header values may hold visible characters, spaces and tabs, but not at either end.
    static func problem(_ value: String) -> String? {
        if let c = value.unicodeScalars.first(where: { $0.value < 0x20 || $0.value == 0x7F }) {
            let name: String
            switch c.value {
            case 0x0A: name = "a newline"
            case 0x0D: name = "a carriage return"
            case 0x09: name = "a tab"
            default: name = "a control character"
            }
            let atEnd = value.unicodeScalars.last == c && value.unicodeScalars.filter({ $0.value < 0x20 || $0.value == 0x7F }).count == 1
            return "contains \(name)\(atEnd ? " at its end (a copy-paste slip?)" : "")"
        }
        if let first = value.unicodeScalars.first, let last = value.unicodeScalars.last,
           first.properties.isWhitespace || last.properties.isWhitespace {
            return "starts or ends with whitespace"
        }
        return nil
    }
}

/// RFC 3986 unreserved characters pass; everything else is %-encoded (continue tokens are base64 with
/// `=`, `+`, `/`; label selectors have `=`, `!`, `,`, spaces and parentheses).
func percentEncode(_ s: String) -> String {
    var out = ""
    for b in s.utf8 {
        switch b {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            out.unicodeScalars.append(Unicode.Scalar(b))
        default:
            let hex = String(b, radix: 16, uppercase: true)
            out += "%" + (hex.count == 1 ? "0" + hex : hex)
        }
    }
    return out
}
