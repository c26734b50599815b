import ArgumentParser
import Foundation
import NetAddress
import RulePlanning
import RuleRendering
import ServiceResolution

enum RenderFormat: String, ExpressibleByArgument, CaseIterable {
    case nft, iptables, ip6tables, json
}

struct Render: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the rules for review: an nft script, iptables-restore text, or JSON.",
        discussion: """
        Nothing on the node is read or changed. With --target auto (the default) there is no node to look \
        at: services with EndpointSlices in the input are sent to their endpoints, the others to their \
        ClusterIP (with a warning, because under kube-proxy's iptables or nftables mode that ClusterIP is \
        never translated).

        Examples:
          kubectl get services,endpointslices -A -o json > cluster.json
          hostnet-dnat render -f cluster.json --format nft > hostnet-dnat.nft
          hostnet-dnat render -f cluster.json --format iptables > rules.v4
          hostnet-dnat render -f cluster.json --format ip6tables > rules.v6
          hostnet-dnat render -f cluster.json --format json | jq .
          kubectl get svc -A -o yaml | hostnet-dnat render -f - --target cluster-ip
          hostnet-dnat render --kubeconfig ~/.kube/config --context prod --format nft
        """)

    @OptionGroup(title: "Input") var source: SourceOptions
    @OptionGroup(title: "Selection") var resolution: ResolutionFlags
    @OptionGroup(title: "Rules") var planFlags: PlanFlags

    @Option(help: ArgumentHelp("nft, iptables, ip6tables or json.", valueName: "format"))
    var format: RenderFormat = .nft

    @Option(name: [.short, .customLong("output")], help: ArgumentHelp("Write to this file instead of stdout (written only when everything succeeded; a regular file is replaced whole, anything else such as a device or a symlink is written in place).", valueName: "file"))
    var outputFile: String?

    func run() async throws {
        try await Console.run {
            let settings = try planFlags.settings(onConflict: resolution.onConflict)
            let options = try resolution.resolutionOptions()
            let objects = try await Pipeline.loadObjects(source, namespaces: resolution.namespaces, selector: try resolution.serverSelector())
            let plan = try Pipeline.plan(objects: objects, resolution: options, settings: settings)
            let text: String
            switch format {
            case .nft:
                do { text = try NftRenderer.render(plan) } catch { throw CLIError(.usage, "\(error)") }
            case .iptables: text = IptablesRenderer.render(plan, family: .ipv4)
            case .ip6tables: text = IptablesRenderer.render(plan, family: .ipv6)
            case .json: text = JSONRenderer.render(plan)
            }
            if format != .json {
                for w in plan.warnings { Console.warning(w.message) }
            }
            if let outputFile {
                try OutputFile.write(text, to: outputFile)
            } else {
                try Console.out(text)
            }
            if format != .json {
                let family: IPFamily? = format == .iptables ? .ipv4 : (format == .ip6tables ? .ipv6 : nil)
                let count = family.map { plan.rules($0).count } ?? plan.rules.count
                Console.note(summary(plan, mapped: count, objects: objects.services.count))
            }
        }
    }

    func summary(_ plan: RulePlan, mapped: Int, objects: Int) -> String {
        let skippedServices = Set(plan.skipped.map(\.service)).count
        return "\(mapped) mapping(s) from \(objects) service(s); \(skippedServices) service(s) with skipped items"
            + (plan.skipped.isEmpty ? "" : " (see --format json for reasons)")
    }
}

/// `-o FILE`: a regular file (or a new one) is replaced whole through a temporary beside it and a rename,
/// so a failure never leaves half a rule file. Anything else is written in place: a rename would turn
/// `/dev/null` into a regular file for the whole node, or replace a symlink by a copy.
enum OutputFile {
    static func write(_ text: String, to path: String) throws(CLIError) {
        var st = stat()
        if lstat(path, &st) == 0 {
            switch st.st_mode & S_IFMT {
            case S_IFREG: try replace(path, with: text, mode: st.st_mode & 0o7777)
            case S_IFDIR: throw CLIError(.cantCreate, "\(path): is a directory")
            default: try writeInPlace(path, text)
            }
        } else if errno == ENOENT {
            try replace(path, with: text, mode: nil)
        } else {
            throw CLIError(.cantCreate, "\(path): cannot write (\(String(cString: strerror(errno))))")
        }
    }

    private static func writeInPlace(_ path: String, _ text: String) throws(CLIError) {
        let fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOCTTY)
        guard fd >= 0 else { throw CLIError(.cantCreate, "\(path): cannot write (\(String(cString: strerror(errno))))") }
        defer { close(fd) }
        if let why = Console.write(fd, text) { throw CLIError(.ioError, "\(path): write failed (\(why))") }
    }

    /// `mode`: an existing file's, kept; nil for a new file (0644 less the umask).
    private static func replace(_ path: String, with text: String, mode: mode_t?) throws(CLIError) {
        let tmp = path + ".tmp-\(getpid())"
        // O_EXCL: never follow a link someone planted at the temporary name.
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode ?? 0o644)
        guard fd >= 0 else { throw CLIError(.cantCreate, "\(path): cannot write (\(String(cString: strerror(errno))))") }
        if let mode { fchmod(fd, mode) }  // what the umask took away from an existing file's mode
        var failure = Console.write(fd, text)
        if failure == nil, fsync(fd) != 0 { failure = String(cString: strerror(errno)) }
        close(fd)
        if let failure {
            unlink(tmp)
            throw CLIError(.ioError, "\(path): write failed (\(failure)); the file was left as it was")
        }
        if rename(tmp, path) != 0 {
            let why = String(cString: strerror(errno))
            unlink(tmp)
            throw CLIError(.cantCreate, "\(path): cannot write (\(why))")
        }
    }
}
