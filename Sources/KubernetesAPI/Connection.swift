import Foundation
import KubeObjects

/// Where the API server is: `scheme://host:port` plus an optional path prefix (Rancher, proxies).
struct ServerAddress: Sendable, Equatable {
    var scheme: String
    /// Without brackets for IPv6.
    var host: String
    var port: Int
    /// "" or "/prefix" (never a trailing slash).
    var basePath: String

    init(scheme: String, host: String, port: Int, basePath: String = "") {
        self.scheme = scheme; self.host = host; self.port = port; self.basePath = basePath
    }

    /// Parses `https://host:port/prefix` the way client-go does: no scheme means https, no port means the
    /// scheme's default, IPv6 literals in brackets.
    init?(parsing text: String) {
        var rest = Substring(text.trimmingCharacters(in: .whitespaces))
        var scheme = "https"
        if let r = rest.range(of: "://") {
            scheme = rest[..<r.lowerBound].lowercased()
            rest = rest[r.upperBound...]
        }
        guard scheme == "https" || scheme == "http" else { return nil }
        let authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        var path = String(rest.dropFirst(authority.count).prefix { $0 != "?" && $0 != "#" })
        while path.hasSuffix("/") { path.removeLast() }
        var hostPort = authority
        if let at = hostPort.lastIndex(of: "@") { hostPort = hostPort[hostPort.index(after: at)...] }
        var host: Substring
        var portText: Substring?
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { return nil }
            host = hostPort[hostPort.index(after: hostPort.startIndex)..<close]
            let after = hostPort[hostPort.index(after: close)...]
            if after.hasPrefix(":") { portText = after.dropFirst() } else if !after.isEmpty { return nil }
        } else if let colon = hostPort.lastIndex(of: ":") {
            host = hostPort[..<colon]
            portText = hostPort[hostPort.index(after: colon)...]
        } else {
            host = hostPort
        }
        guard !host.isEmpty, !host.contains(" ") else { return nil }
        var port = scheme == "https" ? 443 : 80
        if let portText {
            guard let p = Int(portText), (1...65535).contains(p) else { return nil }
            port = p
        }
        self.init(scheme: scheme, host: String(host), port: port, basePath: path)
    }

    var hostForURL: String { host.contains(":") ? "[\(host)]" : host }

    /// `https://host:port`, as shown in messages.
    var display: String { "\(scheme)://\(hostForURL):\(port)\(basePath)" }
}

/// Certificate or key bytes and where they came from (for messages; never the bytes themselves).
struct PEMMaterial: Sendable {
    var bytes: [UInt8]
    var origin: String
}

enum ServerTrust: Sendable {
    /// The system's CA bundle (a kubeconfig with no certificate-authority).
    case systemRoots
    case certificateAuthority(PEMMaterial)
    /// `insecure-skip-tls-verify: true` in a kubeconfig. Never chosen by default.
    case insecureSkipVerify
}

/// The `exec` stanza of a kubeconfig user.
struct ExecConfig: Sendable {
    var apiVersion: String
    var command: String
    var args: [String]
    var env: [(name: String, value: String)]
    var provideClusterInfo: Bool
    var interactiveMode: String?
    var installHint: String?
    /// `user "name" in /path/config`, for messages.
    var origin: String
}

struct AuthConfig: Sendable {
    var token: String?
    /// Read again before every request (a projected or rotated token).
    var tokenFile: String?
    var username: String?
    var password: String?
    var clientCertificate: PEMMaterial?
    var clientKey: PEMMaterial?
    var exec: ExecConfig?
    var impersonateUser: String?
    var impersonateUID: String?
    var impersonateGroups: [String] = []
    /// "the in-cluster service account", `kubeconfig user "admin"`; used in 401/403 messages.
    var identity: String = "anonymous"

    var isEmpty: Bool {
        token == nil && tokenFile == nil && username == nil && clientCertificate == nil && exec == nil
    }
}

/// Everything needed to reach one API server and prove who we are.
struct ClusterConnection: Sendable {
    var server: ServerAddress
    var tlsServerName: String?
    var trust: ServerTrust
    var auth: AuthConfig
    /// "in-cluster configuration" or `kubeconfig /path (context "prod")`.
    var origin: String
    /// The cluster stanza handed to exec plugins that ask for it (`provideClusterInfo`).
    var clusterInfoForExec: ExecClusterInfo?
}

struct ExecClusterInfo: Sendable {
    var server: String
    var tlsServerName: String?
    var insecureSkipTLSVerify: Bool
    var certificateAuthorityData: [UInt8]?
}

/// Kubeconfigs, certificates, keys and tokens are small; a path that names `/dev/zero` or a huge file
/// must not cost unbounded memory. Read whole, at most `ConfigFile.limit` bytes.
enum ConfigFile {
    static let limit = 16 << 20

    enum Failure: Error {
        case unreadable
        case tooLarge
    }

    static func read(_ path: String) -> Result<[UInt8], Failure> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(.unreadable) }
        defer { close(fd) }
        do {
            return .success(try InputReader.readAll(fd: fd, name: path, limit: limit))
        } catch {
            if case .tooLarge = error { return .failure(.tooLarge) }
            return .failure(.unreadable)
        }
    }

    static let tooLargeText = "larger than \(limit >> 20) MiB, which no kubeconfig, certificate or token is"
}
