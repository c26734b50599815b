import ArgumentParser
import Foundation
import KubeObjects
import RulePlanning
import ServiceResolution
import Orchestration
import KubernetesAPI

/// The CLI's door to the pipeline (Orchestration): flags in, values out.
enum Pipeline {
    static func loadObjects(_ source: SourceOptions, namespaces: [String], selector: String?) async throws(CLIError) -> ClusterObjects {
        do { return try await ObjectLoading.load(source.objectSource(namespaces: namespaces, selector: selector)) } catch {
            throw CLIError(error)
        }
    }

    static func plan(objects: ClusterObjects, resolution options: ResolutionOptions, settings: PlanSettings) throws(CLIError) -> RulePlan {
        do { return try Planning.plan(objects, options: options, settings: settings) } catch { throw CLIError(error) }
    }
}

extension SourceOptions {
    func objectSource(namespaces: [String], selector: String?) -> ObjectSource {
        if filenames.isEmpty {
            return .api(KubernetesSourceOptions(kubeconfig: kubeconfig, context: context, namespaces: namespaces,
                                                labelSelector: selector))
        }
        return .files(filenames)
    }
}

/// Messages for people go to stderr, so stdout stays the rendered file or JSON.
enum Console {
    static func error(_ message: String) {
        FileHandle.standardError.write(Data("hostnet-dnat: error: \(message)\n".utf8))
    }
    static func warning(_ message: String) {
        FileHandle.standardError.write(Data("hostnet-dnat: warning: \(message)\n".utf8))
    }
    static func note(_ message: String) {
        FileHandle.standardError.write(Data("hostnet-dnat: \(message)\n".utf8))
    }
    static func out(_ text: String) {
        FileHandle.standardOutput.write(Data(text.utf8))
    }

    /// Runs a command body, turning our errors into a message and a sysexits code (never a stack trace).
    static func run(_ body: () async throws -> Void) async throws {
        do {
            try await body()
        } catch let e as CLIError {
            error(e.message)
            throw ExitCode(e.status)
        }
    }
}
