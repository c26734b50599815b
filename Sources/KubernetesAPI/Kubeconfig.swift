import Foundation
import KubeObjects
import Yams

/// kubeconfig files read and merged the way kubectl does: the first file to define a cluster, user or
/// context name wins, and so does the first `current-context`. Relative paths inside a file resolve
/// against that file's folder.
struct Kubeconfig {
    struct Entry {
        var node: Node
        /// Absolute path of the file that defined it.
        var file: String
    }

    var files: [String] = []
    var clusters: [String: Entry] = [:]
    var users: [String: Entry] = [:]
    var contexts: [String: Entry] = [:]
    var contextNames: [String] = []
    var currentContext: String?

    /// Which files to read: `--kubeconfig` alone when given, else the `KUBECONFIG` list, else ~/.kube/config.
    /// Files of the `KUBECONFIG` list that don't exist are skipped, as kubectl does; an explicit
    /// `--kubeconfig` must exist.
    static func candidateFiles(explicit: String?, environment: [String: String], currentDirectory: String)
        -> (paths: [String], mustExist: Bool, describedAs: String)
    {
        if let explicit, !explicit.isEmpty {
            return ([absolute(explicit, relativeTo: currentDirectory)], true, "--kubeconfig \(explicit)")
        }
        if let list = environment["KUBECONFIG"], !list.isEmpty {
            var seen = Set<String>()
            var paths: [String] = []
            for part in list.split(separator: ":", omittingEmptySubsequences: true) {
                let p = absolute(String(part), relativeTo: currentDirectory)
                if seen.insert(p).inserted { paths.append(p) }
            }
            return (paths, false, "KUBECONFIG=\(list)")
        }
        let home = environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? NSHomeDirectory()
        let path = (home as NSString).appendingPathComponent(".kube/config")
        return ([path], false, path)
    }

    static func absolute(_ path: String, relativeTo dir: String) -> String {
        if path.hasPrefix("/") { return (path as NSString).standardizingPath }
        return ((dir as NSString).appendingPathComponent(path) as NSString).standardizingPath
    }

    /// Reads and merges the files. Returns nil when none of them exists (and none had to).
    static func load(paths: [String], mustExist: Bool) throws(KubernetesAPIError) -> Kubeconfig? {
        var merged = Kubeconfig()
        var foundAny = false
        for path in paths {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue else {
                if mustExist {
                    throw KubernetesAPIError(.configuration, "kubeconfig \(path): no such file")
                }
                continue
            }
            foundAny = true
            let data: [UInt8]
            switch ConfigFile.read(path) {
            case .success(let d): data = d
            case .failure(.tooLarge): throw KubernetesAPIError(.configuration, "kubeconfig \(path): \(ConfigFile.tooLargeText)")
            case .failure: throw KubernetesAPIError(.configuration, "kubeconfig \(path): cannot be read (permission denied?)")
            }
            merged.files.append(path)
            try merged.merge(data: data, file: path)
        }
        return foundAny ? merged : nil
    }

    mutating func merge(data: [UInt8], file: String) throws(KubernetesAPIError) {
        guard let text = String(validating: data, as: UTF8.self) else {
            throw KubernetesAPIError(.configuration, "kubeconfig \(file): not UTF-8 text")
        }
        do throws(YAMLBudget.Violation) {
            try YAMLBudget.check(data)
        } catch {
            throw KubernetesAPIError(.configuration, "kubeconfig \(file): \(error.description)")
        }
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            // Only the first line: Yams appends a snippet of the file, which could hold a token.
            let first = "\(error)".split(separator: "\n").first.map(String.init) ?? "unreadable"
            throw KubernetesAPIError(.configuration, "kubeconfig \(file): malformed YAML: \(first)")
        }
        guard let root else { return }  // an empty file, which kubectl accepts
        guard root.mapping != nil else {
            if root.null != nil || root.scalar?.string.isEmpty == true { return }
            throw KubernetesAPIError(.configuration, "kubeconfig \(file): expected a mapping (apiVersion: v1, kind: Config)")
        }
        if currentContext == nil, let cc = root["current-context"]?.scalar?.string, !cc.isEmpty {
            currentContext = cc
        }
        try Self.mergeNamed(root, key: "clusters", inner: "cluster", file: file, into: &clusters)
        try Self.mergeNamed(root, key: "users", inner: "user", file: file, into: &users)
        contextNames += try Self.mergeNamed(root, key: "contexts", inner: "context", file: file, into: &contexts)
    }

    /// Adds the entries of one list (`clusters`, `users`, `contexts`) whose names are new; returns those names.
    @discardableResult
    private static func mergeNamed(_ root: Node, key: String, inner: String, file: String,
                                   into dict: inout [String: Entry]) throws(KubernetesAPIError) -> [String] {
        var added: [String] = []
        guard let list = root[key], list.null == nil else { return [] }
        guard let seq = list.sequence else {
            throw KubernetesAPIError(.configuration, "kubeconfig \(file): \(key) is not a list")
        }
        for (i, item) in seq.enumerated() {
            guard let name = item["name"]?.scalar?.string, !name.isEmpty else {
                throw KubernetesAPIError(.configuration, "kubeconfig \(file): \(key)[\(i)] has no name")
            }
            guard dict[name] == nil else { continue }  // first file to define a name wins
            let body = item[inner] ?? Node.mapping([:])
            dict[name] = Entry(node: body, file: file)
            added.append(name)
        }
        return added
    }
}

/// Typed reads from one kubeconfig stanza, with messages that name the file and the stanza.
struct StanzaReader {
    let node: Node
    let file: String
    /// `cluster "prod"`.
    let label: String

    var folder: String { (file as NSString).deletingLastPathComponent }

    func fail(_ field: String, _ message: String) -> KubernetesAPIError {
        KubernetesAPIError(.configuration, "kubeconfig \(file): \(label): \(field): \(message)")
    }

    func string(_ key: String) throws(KubernetesAPIError) -> String? {
        guard let v = node[key], v.null == nil else { return nil }
        guard let s = v.scalar?.string else { throw fail(key, "expected a string") }
        return s.isEmpty ? nil : s
    }

    /// A value that goes into an HTTP header (a token, a basic-auth part, an impersonation name). Checked
    /// here, where the message can name the field; the value is never shown. Unlike a token file, an
    /// inline value is not trimmed (client-go does not trim it either; the HTTP layer would refuse it).
    func credential(_ key: String) throws(KubernetesAPIError) -> String? {
        guard let s = try string(key) else { return nil }
        try checkCredential(s, field: key)
        return s
    }

    func checkCredential(_ s: String, field: String) throws(KubernetesAPIError) {
        if let why = CredentialCheck.problem(s) { throw fail(field, "\(why); the value is not shown") }
    }

    func bool(_ key: String) throws(KubernetesAPIError) -> Bool {
        guard let v = node[key], v.null == nil else { return false }
        if let b = v.bool { return b }
        switch v.scalar?.string.lowercased() {
        case "true"?: return true
        case "false"?, ""?: return false
        default: throw fail(key, "expected true or false")
        }
    }

    func stringList(_ key: String) throws(KubernetesAPIError) -> [String] {
        guard let v = node[key], v.null == nil else { return [] }
        guard let seq = v.sequence else { throw fail(key, "expected a list") }
        var out: [String] = []
        for item in seq {
            guard let s = item.scalar?.string else { throw fail(key, "expected a list of strings") }
            out.append(s)
        }
        return out
    }

    /// A path, resolved against the kubeconfig's folder when relative.
    func path(_ key: String) throws(KubernetesAPIError) -> String? {
        guard let p = try string(key) else { return nil }
        return Kubeconfig.absolute(p, relativeTo: folder)
    }

    /// `*-data` fields: base64 of the PEM text.
    func base64Data(_ key: String) throws(KubernetesAPIError) -> [UInt8]? {
        guard let s = try string(key) else { return nil }
        let cleaned = s.filter { !$0.isWhitespace }
        guard let d = Data(base64Encoded: cleaned) else { throw fail(key, "not valid base64") }
        return [UInt8](d)
    }

    /// Bytes from `<key>-data` (preferred, as client-go does) or the file named by `<key>`.
    func material(_ key: String) throws(KubernetesAPIError) -> PEMMaterial? {
        if let d = try base64Data("\(key)-data") {
            return PEMMaterial(bytes: d, origin: "\(key)-data of \(label) in \(file)")
        }
        guard let p = try path(key) else { return nil }
        return PEMMaterial(bytes: try readFile(p, what: key), origin: p)
    }

    func readFile(_ path: String, what: String) throws(KubernetesAPIError) -> [UInt8] {
        switch ConfigFile.read(path) {
        case .success(let d): return d
        case .failure(.tooLarge): throw fail(what, "\(path) is \(ConfigFile.tooLargeText)")
        case .failure:
            let exists = FileManager.default.fileExists(atPath: path)
            throw fail(what, "cannot read \(path)" + (exists ? " (permission denied?)" : ": no such file"))
        }
    }
}

extension Kubeconfig {
    /// Picks the context (`--context`, else current-context) and turns it into a connection.
    func connection(context requested: String?) throws(KubernetesAPIError) -> ClusterConnection {
        let filesText = files.joined(separator: ":")
        let available = contextNames.isEmpty ? "none defined" : contextNames.map { "\"\($0)\"" }.joined(separator: ", ")
        guard let contextName = requested ?? currentContext else {
            throw KubernetesAPIError(.configuration,
                "kubeconfig \(filesText): no current-context is set; pass --context NAME (contexts: \(available))")
        }
        guard let ctx = contexts[contextName] else {
            throw KubernetesAPIError(.configuration,
                "kubeconfig \(filesText): context \"\(contextName)\" not found (contexts: \(available))")
        }
        let ctxReader = StanzaReader(node: ctx.node, file: ctx.file, label: "context \"\(contextName)\"")
        guard let clusterName = try ctxReader.string("cluster") else {
            throw ctxReader.fail("cluster", "missing")
        }
        guard let clusterEntry = clusters[clusterName] else {
            throw ctxReader.fail("cluster", "cluster \"\(clusterName)\" is not defined in \(filesText)")
        }
        let cluster = StanzaReader(node: clusterEntry.node, file: clusterEntry.file, label: "cluster \"\(clusterName)\"")
        guard let serverText = try cluster.string("server") else { throw cluster.fail("server", "missing") }
        guard let server = ServerAddress(parsing: serverText) else {
            throw cluster.fail("server", "\"\(serverText)\" is not an http(s) URL")
        }
        if try cluster.string("proxy-url") != nil {
            throw cluster.fail("proxy-url", "proxies are not supported; reach the API server directly or through `kubectl proxy` (server: http://127.0.0.1:8001)")
        }
        let insecure = try cluster.bool("insecure-skip-tls-verify")
        let ca = try cluster.material("certificate-authority")
        if insecure && ca != nil {
            throw cluster.fail("insecure-skip-tls-verify",
                               "set together with a certificate-authority; remove one of them (client-go refuses this too)")
        }
        let trust: ServerTrust = insecure ? .insecureSkipVerify : (ca.map { .certificateAuthority($0) } ?? .systemRoots)
        let tlsServerName = try cluster.string("tls-server-name")

        var auth = AuthConfig()
        let userName = try ctxReader.string("user")
        if let userName {
            guard let userEntry = users[userName] else {
                throw ctxReader.fail("user", "user \"\(userName)\" is not defined in \(filesText)")
            }
            auth = try Self.auth(StanzaReader(node: userEntry.node, file: userEntry.file, label: "user \"\(userName)\""))
            auth.identity = "kubeconfig user \"\(userName)\""
        }
        let info = ExecClusterInfo(server: serverText, tlsServerName: tlsServerName, insecureSkipTLSVerify: insecure,
                                   certificateAuthorityData: ca?.bytes)
        return ClusterConnection(server: server, tlsServerName: tlsServerName, trust: trust, auth: auth,
                                 origin: "kubeconfig \(filesText) (context \"\(contextName)\")",
                                 clusterInfoForExec: info)
    }

    static func auth(_ user: StanzaReader) throws(KubernetesAPIError) -> AuthConfig {
        var auth = AuthConfig()
        auth.token = try user.credential("token")
        auth.tokenFile = try user.path("tokenFile")
        auth.username = try user.credential("username")
        if auth.username?.contains(":") == true {
            throw user.fail("username", "contains a colon, which basic authentication cannot carry; the value is not shown")
        }
        auth.password = try user.credential("password")
        auth.clientCertificate = try user.material("client-certificate")
        auth.clientKey = try user.material("client-key")
        if (auth.clientCertificate == nil) != (auth.clientKey == nil) {
            throw user.fail(auth.clientKey == nil ? "client-key" : "client-certificate",
                            "missing: client-certificate and client-key must be given together")
        }
        auth.impersonateUser = try user.credential("as")
        auth.impersonateUID = try user.credential("as-uid")
        auth.impersonateGroups = try user.stringList("as-groups")
        for g in auth.impersonateGroups { try user.checkCredential(g, field: "as-groups") }
        if let provider = user.node["auth-provider"], provider.null == nil {
            let p = StanzaReader(node: provider, file: user.file, label: user.label + " auth-provider")
            let name = try p.string("name") ?? "?"
            // The OIDC provider's id-token is a bearer token; the others were removed from client-go.
            if name == "oidc", let cfg = provider["config"], let idToken = cfg["id-token"]?.scalar?.string, !idToken.isEmpty {
                try p.checkCredential(idToken, field: "config.id-token")
                if auth.token == nil && auth.tokenFile == nil { auth.token = idToken }
            } else {
                throw p.fail("name", "the \"\(name)\" auth-provider is not supported (client-go dropped it too); use an exec credential plugin (for example gke-gcloud-auth-plugin or kubelogin)")
            }
        }
        if let exec = user.node["exec"], exec.null == nil {
            let e = StanzaReader(node: exec, file: user.file, label: user.label + " exec")
            guard let apiVersion = try e.string("apiVersion") else { throw e.fail("apiVersion", "missing") }
            guard ExecPlugin.supportedVersions.contains(apiVersion) else {
                throw e.fail("apiVersion", "\"\(apiVersion)\" is not supported (expected \(ExecPlugin.supportedVersions.joined(separator: " or ")))")
            }
            guard var command = try e.string("command") else { throw e.fail("command", "missing") }
            // client-go resolves the command against the kubeconfig's folder only when it is a path.
            if command.contains("/") { command = Kubeconfig.absolute(command, relativeTo: e.folder) }
            var env: [(name: String, value: String)] = []
            if let envNode = exec["env"], envNode.null == nil {
                guard let seq = envNode.sequence else { throw e.fail("env", "expected a list of {name, value}") }
                for item in seq {
                    guard let n = item["name"]?.scalar?.string, !n.isEmpty else { throw e.fail("env", "an entry has no name") }
                    env.append((n, item["value"]?.scalar?.string ?? ""))
                }
            }
            let mode = try e.string("interactiveMode")
            if let mode, !["Never", "IfAvailable", "Always"].contains(mode) {
                throw e.fail("interactiveMode", "\"\(mode)\" is not one of Never, IfAvailable, Always")
            }
            auth.exec = ExecConfig(apiVersion: apiVersion, command: command, args: try e.stringList("args"), env: env,
                                   provideClusterInfo: try e.bool("provideClusterInfo"), interactiveMode: mode,
                                   installHint: try e.string("installHint"), origin: "\(user.label) in \(user.file)")
        }
        return auth
    }
}
